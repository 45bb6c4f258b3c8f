#!/bin/sh
# A program computation (dispy runs it directly on the node): the job's arguments are
# its command-line arguments, dispy's node values are environment variables, and its
# exit code is the job's result.
echo "args: $*"
echo "node: $dispy_node_name"
if [ "$(pwd -P)" = "$(cd "$dispy_job_path" && pwd -P)" ]; then
    echo "cwd: dispy_job_path"
fi
echo "note about $1" >&2
exit "$2"
