"""Loads the fault-injection helpers (``_faults.py``) once, as ``reliability_faults_helpers``, for every test here
(pytest's importlib mode gives test folders no package to import them from)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

FAULTS_MODULE = "reliability_faults_helpers"

if FAULTS_MODULE not in sys.modules:
    _spec = importlib.util.spec_from_file_location(FAULTS_MODULE, Path(__file__).with_name("_faults.py"))
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[FAULTS_MODULE] = _module
    _spec.loader.exec_module(_module)
