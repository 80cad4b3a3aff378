"""The special-token ids every tokenizer shares (0..7), so objectives (MLM masks, span
sentinels, diffusion masks), packing and decoding can use them without asking which
tokenizer is in use. Ordinary tokens start at `NUM_SPECIAL`."""

PAD_ID = 0  # padding; segment id 0 in packed batches
EOS_ID = 1  # appended to every document
BOS_ID = 2
MASK_ID = 3  # MLM and masked-diffusion mask
CLS_ID = 4
SEP_ID = 5
UNK_ID = 6
NUM_SPECIAL = 8  # ids 0..7 are reserved (7 is spare); ordinary tokens start here
