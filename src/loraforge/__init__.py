"""loraforge: LoRA/QLoRA fine-tuning that plans itself for the hardware it finds."""

import time as _time

__version__ = "0.1.0"
IMPORTED_AT = _time.time()  # the start-up clock's fallback where /proc is not there
