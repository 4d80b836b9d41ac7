"""Every byte from outside is checked here.

references.py  API side: a request's image string -> ImageRef (inline bytes stored, own files by key)
fetch.py       worker side: an ImageRef -> an RGB image (storage, or http(s) through the guard)
images.py      probe (without decoding pixels), decode, encode
netguard.py    the SSRF guard every outbound request goes through
"""
