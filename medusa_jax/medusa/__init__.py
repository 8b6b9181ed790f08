"""What Medusa adds to a backbone: the heads, candidate trees and their buffers, the drafting vocabulary."""
