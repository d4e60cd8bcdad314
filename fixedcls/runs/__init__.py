"""What a run leaves behind and how it is found again: checkpoints (`checkpoints`), run folders and what a
run resumes (`folders`), run identities (`identity`), configs read back (`stored`) and a trained model
rebuilt from its checkpoint (`rebuild`).
"""
