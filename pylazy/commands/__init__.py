"""The ``pylazy`` subcommands: one module each, with ``register(subparsers)`` (adds its parser,
light: the parser is built on every start) and ``main(args) -> exit code`` (imports the heavy
parts). Shared arguments and UsageError: pylazy.cli_args. The list: pylazy.cli.COMMAND_MODULES."""
