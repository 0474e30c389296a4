import sys

from fisherdist.cli import main

sys.exit(main())
