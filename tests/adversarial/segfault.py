"""Crashes the process: reads address 0 through ctypes.

expect: status crashed: SIGSEGV
"""
import ctypes


def generate(pipe, batch):
    ctypes.string_at(0)
