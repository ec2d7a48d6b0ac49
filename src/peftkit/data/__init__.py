"""Data readers: every format the tasks train on, each returned as ``list[dict]``.

Plain lists of dicts keep readers independent of any data library; the task layer turns
records into features. ``read_records`` picks a reader from a path or hub spec::

    read_records(".../cls_sst2/sst2_glue_validation.tsv")   # [{"sentence", "label"}, ...]
    read_records(".../ner_wnut17/wnut17train.conll")        # [{"tokens", "tags"}, ...]
    read_records("hf:glue:sst2@validation")                 # via `datasets`, when online

Errors name the file and line: ``DataFormatError`` (a ``ValueError``) for malformed rows,
``FileNotFoundError`` for missing files.
"""

from .conll import read_conll
from .dispatch import READERS, parse_hub_spec, read_records
from .errors import DataFormatError
from .hub import load_hub_dataset
from .images import read_idx, read_idx_array, read_image_files, read_image_folder
from .paths import shared_data_dir
from .squad import read_squad
from .tables import read_json, read_jsonl, read_table
from .text import read_financial_phrasebank, read_text

__all__ = [
    "DataFormatError",
    "READERS",
    "load_hub_dataset",
    "parse_hub_spec",
    "read_conll",
    "read_financial_phrasebank",
    "read_idx",
    "read_idx_array",
    "read_image_files",
    "read_image_folder",
    "read_json",
    "read_jsonl",
    "read_records",
    "read_squad",
    "read_table",
    "read_text",
    "shared_data_dir",
]
