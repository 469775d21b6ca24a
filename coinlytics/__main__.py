"""``python -m coinlytics``: the ``coinlytics`` command (containers run ``python -m coinlytics migrate``)."""

from coinlytics.cli import main

main()
