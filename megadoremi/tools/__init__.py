"""Command-line entry points. ``tools/*.py`` and the console scripts in setup.py call ``main()`` here."""
