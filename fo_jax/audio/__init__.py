"""Speech input front end: audio io and resampling (io), Kaldi fbank, offline and streaming
(fbank), global CMVN (cmvn)."""
