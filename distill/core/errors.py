"""User-facing errors: one line naming the problem and the fix; the CLI exits with code 2."""


class DistillError(Exception):
    """A problem the user can fix (bad config, missing file, bad input). Printed as one line, exit 2."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)
