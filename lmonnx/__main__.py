import sys

from lmonnx.cli import main

sys.exit(main())
