"""The one exception type that means "the user asked for something impossible".

Defined in data_prep.errors (data_prep imports nobody); this is the same class, not a subclass, so
``except HardnegError`` catches the errors of both sides.
"""

from data_prep.errors import HardnegError

__all__ = ["HardnegError"]
