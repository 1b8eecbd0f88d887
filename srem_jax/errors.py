"""The one exception type users see as a single clear line.

Anything that is the user's mistake (a missing file, a malformed noise file, an
unknown config key, ...) raises `UserError` with a message naming the file or
field and what was expected. Entry points catch it, print `error: <message>` to
stderr and exit with status 2, so no traceback reaches the user.

    raise UserError(f"{path}: expected float32 array of rank 3, got {arr.shape}")
"""


class UserError(Exception):
  """A problem with the user's input, reported as one line without traceback."""
