"""Training: the loop, token data, balance losses, held-out loss and classic EM for mixtures."""
