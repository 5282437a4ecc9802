import sys

from sqlproxy.cli import main

sys.exit(main())
