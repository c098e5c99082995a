"""What the `kunlun-compile` verbs run besides compiling: recording graphs, bisecting, aligning,
drawing and benchmarking.  The CLI (cli/main.py) only parses arguments and prints."""
