"""The core: errors, answer types and extraction, problem sources, artifact I/O, model sources, console
and progress, environment defaults, the Ray executor. Imports nothing else of distill."""
