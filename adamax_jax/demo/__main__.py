"""``python -m adamax_jax.demo``: runs :func:`adamax_jax.demo.tour.main`."""

from adamax_jax.demo.tour import main

if __name__ == "__main__":
    main()
