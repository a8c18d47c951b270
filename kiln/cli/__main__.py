"""`python -m kiln.cli ...`: how `kiln run` starts its children, and the tests start Kiln."""

from kiln.cli import main

main()
