"""``python -m natrio``: the same command line as the ``natrio`` console script."""

from natrio._cli import main

if __name__ == "__main__":
    main()
