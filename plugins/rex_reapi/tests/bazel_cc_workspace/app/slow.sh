#!/bin/bash
sleep 120
