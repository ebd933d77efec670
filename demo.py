"""lensbench demo (placeholder until the Gradio UI lands): the lens on the bundled model in the terminal."""

import sys

from tracing.__main__ import main

if __name__ == "__main__":
    args = sys.argv[1:] or ["--prompt", "The capital of Germany is", "--target", " Berlin"]
    sys.exit(main(args))
