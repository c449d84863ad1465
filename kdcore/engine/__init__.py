"""The training engine: build (spec -> parts), step, loop, run folder, the one evaluation."""
