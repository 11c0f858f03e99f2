"""hessdiag: exact gradients and Hessian diagonals of one large parameter tensor."""

__version__ = "0.1.0"
