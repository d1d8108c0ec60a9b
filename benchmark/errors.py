"""The one error class raised at the boundaries (command line, config, file loading)."""


class MedrobustError(Exception):
    """Bad input at a boundary. The message names the file or field and says what to do.

    The command line prints it on one line and exits with code 2.
    """


class FieldError(MedrobustError):
    """A bad value of one named setting (a dataclass field): ``field`` and what is wrong with it (``problem``).

    The library names the field; whoever took the value names it in the words of its source: the config as
    ``training.epochs``, the command line as ``--epochs``.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field, self.problem = field, problem
        super().__init__(f"{field} {problem}")
