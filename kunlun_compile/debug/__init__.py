"""What the `kunlun-compile` verbs run besides compiling: replaying recorded graphs, bisecting,
aligning, drawing and benchmarking.  The CLI (cli/main.py) only parses arguments and prints.
Writing recorded graphs is on the compile path and lives below, in capture/record.py and
capture/graph_io.py."""
