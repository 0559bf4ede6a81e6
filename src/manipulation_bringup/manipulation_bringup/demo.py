"""`make demo`: run the stack on the stub backend and print what it publishes."""

import sys


def main() -> int:
    print("demo: not wired yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
