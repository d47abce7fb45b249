"""The Python data path: the BPF program's rules on Python maps, and its AF_PACKET
forwarder (``attach --datapath scapy``). Never imports BCC."""
