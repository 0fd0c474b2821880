import sys

from quota.cli import main

sys.exit(main())
