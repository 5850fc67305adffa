"""The methods' math as plain functions of tensors (torch and the standard library only)."""
