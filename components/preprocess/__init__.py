"""The preprocessing step: raw event logs -> the sequence dataset (Beam + tf.transform).

``run(input_path, output_dir, ...)`` is the step's logic (see :mod:`.step`);
``recml preprocess`` (:mod:`.cli`) and the KFP component call it.
"""

from components.preprocess.sources.common import ColumnMapping, InputError
from components.preprocess.step import BadInputError, PreprocessResult, run

__all__ = ["BadInputError", "ColumnMapping", "InputError", "PreprocessResult", "run"]
