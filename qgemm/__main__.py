import sys

from qgemm.cli import main

sys.exit(main())
