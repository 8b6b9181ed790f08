"""What Medusa adds to a backbone: the heads, candidate trees and their buffers, the drafting vocabulary."""

DRAFT_VOCAB_SIZE = 8192  # ids the heads guess among unless told otherwise (`draft_vocab.DEFAULT_SIZE`)
