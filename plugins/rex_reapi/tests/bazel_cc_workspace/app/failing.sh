#!/bin/bash
echo rex-failing-test-output
exit 4
