"""placeholder: being written"""
def build(m):
    raise NotImplementedError
