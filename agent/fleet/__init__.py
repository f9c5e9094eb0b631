"""The fleet guard: nodes sharing a store shed for shared reasons only while the group can spare them."""
