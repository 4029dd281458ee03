"""selfspec's own C++ kernels (`csrc/`) and their bindings: built for this CPU on first use (`native`), the few-row
bfloat16 product (`bf16_gemv`), the int4 draft product (`w4a8`), and how kernels are timed against each other
(`timing`)."""
