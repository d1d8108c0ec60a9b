"""The one error class raised at the boundaries (command line, config, file loading)."""


class MedrobustError(Exception):
    """Bad input at a boundary. The message names the file or field and says what to do.

    The command line prints it on one line and exits with code 2.
    """
