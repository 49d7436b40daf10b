"""Argument checks that fail with one line naming the flag and the fix, never a stack trace."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def arg_error(name: str, message: str):
    raise SystemExit(f"error: {flag(name)}: {message}")


def check(condition: bool, name: str, message: str):
    if not condition:
        arg_error(name, message)


def exact_div(a: int, b: int, a_name: str, b_name: str) -> int:
    """a // b, failing loudly (naming both flags) when b does not divide a."""
    check(b > 0, b_name, f"must be positive, got {b}")
    check(a % b == 0, a_name, f"{a} is not divisible by {flag(b_name)} {b}; pick a multiple of {b}")
    return a // b
