"""The losses as pure tensor functions: the diversity settings (`configuration.DiversityConfig`), the regularizers at
the patch, attention and weight levels and the patch-wise loss (`regularizers`), and Mixup/CutMix with the mixed
targets they need (`mixing`). Imports only `utils`."""
