"""The protein language model: finding and loading ESM-2, batching proteins for it, running it to a hook."""
