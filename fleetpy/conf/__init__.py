"""The bottom layer: values and files every other package reads and writes the same way."""
