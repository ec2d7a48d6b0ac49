"""The adapter methods, one module (or package) per method, and the table that lists them.

* :mod:`.table`: THE method table (``method.type`` -> config class, adapter model, 4-bit base);
  what each method can do is declared by its config class (``adapts``, ``model_families``).
* :mod:`.lora` (+ :mod:`.dora`, :mod:`.lora_fused`, :mod:`.lora_mha`, :mod:`.lora_param`,
  :mod:`.trainable_tokens`), :mod:`.adalora` (+ :mod:`.rank_allocator`, :mod:`.adalora_report`),
  :mod:`.prompt` (prompt tuning, P-tuning, prefix tuning), :mod:`.loha` and :mod:`.lokr` (on
  :mod:`.lycoris`), :mod:`.ia3`; every injected layer is an :mod:`.adapter_layer` ``AdapterLayer``.
* :mod:`.add_weighted` (+ :mod:`.task_arithmetic`): ``add_weighted_adapter``, PEFT's adapter
  arithmetic on LoRA and IA3 adapters.

This package imports nothing itself: ``tuner.py`` (the injected methods' adapter model) imports
the layer modules here, and the table imports ``tuner.py``, so imports flow one way.
"""
