#!/bin/bash
out=$("$1")
if [ "$out" != "hello rex" ]; then
  echo "the binary printed: $out"
  exit 1
fi
