"""Other libraries' adapter formats."""

from lorakit.interop.peft import load_peft, save_peft

__all__ = ["load_peft", "save_peft"]
