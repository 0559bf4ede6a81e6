import sys

from manipulation_policy.replay.cli import main

if __name__ == "__main__":
    sys.exit(main())
