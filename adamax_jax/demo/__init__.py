"""A two-minute tour of adamax_jax on CPU: ``python -m adamax_jax.demo``.

It solves the neuralthreads Adamax tutorial's two toy problems with :func:`adamax_jax.adamax` (and
checks the result against the tutorials' own NumPy loop), trains a small Flax NNX
network on scikit-learn's bundled digits with ``adamax``, ``adamaxw``,
``optax.adam`` and ``optax.sgd``, prints the results as tables and writes PNG plots.
Nothing is downloaded. It needs the ``examples`` extra; from the repository's root::

    pip install -e ".[examples]"
    python -m adamax_jax.demo

Run ``python -m adamax_jax.demo --help`` for the options.

The demo is not part of the library: ``import adamax_jax`` does not import it. Its
modules, each usable on its own:

* :mod:`adamax_jax.demo.tour`: the command line, :func:`main`;
* :mod:`adamax_jax.demo.toys`: the toy problems and the tutorial's NumPy loop;
* :mod:`adamax_jax.demo.digits`: the Flax NNX classifier and its training loop;
* :mod:`adamax_jax.demo.plots`: the PNG figures (matplotlib);
* :mod:`adamax_jax.demo.text`: the progress bar and text tables.
"""

from adamax_jax.demo.tour import DemoResults, ToyResult, digits_optimizers, main

__all__ = ["DemoResults", "ToyResult", "digits_optimizers", "main"]
