import sys

from comol.cli import main

sys.exit(main())
