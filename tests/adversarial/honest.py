"""Control: the toy pipeline as it is. It must pass the child's checks (no false alarms).

expect: ok
job: {"count_flops": true}
"""
