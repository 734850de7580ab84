"""``python -m mmsearch``: the same as the `mmsearch` command."""

from mmsearch.cli.main import main

if __name__ == "__main__":
    main()
